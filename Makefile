# Convenience wrappers; make.py does the work and needs nothing but Python.
.PHONY: setup demo test corpora
setup:
	python3 make.py setup
demo:
	python3 make.py demo
test:
	python3 make.py test
corpora:
	python3 make.py corpora
