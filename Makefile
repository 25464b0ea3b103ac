# Convenience wrappers; make.py does the work and needs nothing but Python.
.PHONY: setup demo test
setup:
	python3 make.py setup
demo:
	python3 make.py demo
test:
	python3 make.py test
