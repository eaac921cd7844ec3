"""Shared pytest setup: offline Hugging Face, repo root importable, tiny dataset trees."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from tests.fixtures import make_food101, make_hatememes, make_mmimdb  # noqa: E402


@pytest.fixture(scope="session")
def food101_root(tmp_path_factory):
    return make_food101(tmp_path_factory.mktemp("food101"))


@pytest.fixture(scope="session")
def mmimdb_root(tmp_path_factory):
    return make_mmimdb(tmp_path_factory.mktemp("mmimdb"))


@pytest.fixture(scope="session")
def hatememes_root(tmp_path_factory):
    return make_hatememes(tmp_path_factory.mktemp("hatememes"))
