"""distcls."""
