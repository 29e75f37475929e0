"""Shared test fixtures: the committed clips, the real weights, a model cache.

Built models are cached between runs under $WRUNTIME_TEST_HOME (default:
.wruntime-test-home/ in the checkout, git-ignored), so only the first run pays
for building them. Tests never mock a component we really use.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_SPEECH = ROOT.parent / "shared" / "data" / "speech"

CLIPS = {
    "jfk": (
        DATA / "jfk.flac",
        "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country.",
    ),
    "belly": (DATA / "1089-134686-0001.flac", "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM"),
    "experience": (DATA / "2830-3980-0043.wav", "EXPERIENCE PROVES THIS"),
}

# One cache for every test run in this checkout: building is the slow part.
TEST_HOME = Path(os.environ.get("WRUNTIME_TEST_HOME", ROOT / ".wruntime-test-home"))
os.environ["WRUNTIME_HOME"] = str(TEST_HOME)


@pytest.fixture(scope="session")
def test_home() -> Path:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    return TEST_HOME


@pytest.fixture(scope="session")
def tiny_weights():
    from wruntime.catalog import load_architecture_weights

    return load_architecture_weights("tiny.en")


@pytest.fixture(scope="session")
def base_weights():
    from wruntime.catalog import load_architecture_weights

    return load_architecture_weights("base")
