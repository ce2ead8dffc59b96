import pytest

from sglang_lynx.models import smollm2


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(smollm2())
