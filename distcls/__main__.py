import sys

from distcls.cli import main

sys.exit(main())
