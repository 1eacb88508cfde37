"""Network-namespace toolkit: open, validate, identify, enter and leave; fixtures."""
