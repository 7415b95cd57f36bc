from distcls.cli import run

run()
