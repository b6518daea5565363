"""Synthetic profiles for planner tests: random sizes and sensitivities, shared experts, similarity edges."""

import pytest

from .planner_helpers import random_profile


@pytest.fixture
def make_profile():
    return random_profile
