import os

import pytest

# Keep tests from touching the user's cache unless they ask for the real model.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MONOSCOPE_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="MONOSCOPE_SKIP_SLOW is set")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
