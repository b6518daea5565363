"""``load(..., device=)`` and ``mopeq run|eval --device``: cpu or an available cuda[:N], else refused in one line."""

import pytest
import torch

from mopeq.cli import main
from mopeq.runtime.load import resolve_device
from mopeq.schemas import InputError


def test_resolve_device():
    assert resolve_device("cpu") == resolve_device("cpu:0") == torch.device("cpu")
    for bad in ("tpu", "meta", "cuda:x", "gpu0"):
        with pytest.raises(InputError, match="expected cpu or cuda"):
            resolve_device(bad)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(InputError, match="not available" if count == 0 else "CUDA device"):
        resolve_device(f"cuda:{count}")


@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["eval"]])
def test_cli_refuses_an_unavailable_device_before_loading(command, tmp_path, capsys):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    argv = [command[0], str(tmp_path / "nothing here"), *command[1:], "--device", f"cuda:{count}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"device cuda:{count}" in err
