"""Methods built from their own settings (the recipe's method section) compute the same losses
as the objectives built directly with the defaults every method had before (tau 0.2, loss_mode
pairwise, symmetric false), on one fixed batch, in this process."""

from __future__ import annotations

import pytest
import torch

from firmad.config import load_config
from firmad.errors import ConfigError
from firmad.factory import build_method
from firmad.losses import FIRMLoss, NTXentLoss, SupConLoss
from firmad.methods import METHODS

# recipe overrides -> the objective as it was built from the former flat section
CASES = {
    "firm": ([], FIRMLoss(tau=0.2, mode="pairwise")),
    "firm-concat": (["method.loss_mode=concat"], FIRMLoss(tau=0.2, mode="concat")),
    "firm-tau": (["method.tau=0.5"], FIRMLoss(tau=0.5, mode="pairwise")),
    "ntxent": (["method.name=ntxent"], NTXentLoss(tau=0.2, symmetric=False)),
    "ntxent-symmetric": (
        ["method.name=ntxent", "method.symmetric=true"],
        NTXentLoss(tau=0.2, symmetric=True),
    ),
    "rotsupcon": (["method.name=rotsupcon"], SupConLoss(tau=0.2)),
    "supcon-binary": (["method.name=supcon-binary"], SupConLoss(tau=0.2)),
}


@pytest.mark.parametrize("case", CASES)
def test_method_from_its_settings_gives_the_former_loss(case):
    overrides, former = CASES[case]
    method = build_method(load_config("fmnist-cpu", overrides))
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=1)
    kind_ids = torch.tensor([0, 0, 0, 1, 2, 3, 0, 1])
    class_ids = torch.where(kind_ids > 0, -1, 0)  # as the pool holds them: outliers -1
    labels = method.labels(class_ids, kind_ids)
    z1, z2 = z.chunk(2)
    assert torch.equal(method.embedding_loss(z, labels), former(z1, z2, labels))


def test_methods_without_settings_and_direct_construction():
    for name in ("dsvdd", "binary"):
        assert METHODS[name].setting_keys() == ()
        cfg = load_config("fmnist-cpu", [f"method.name={name}", "outliers.kinds=[rot90]"])
        assert build_method(cfg).settings.model_dump() == {"name": name}
    firm = METHODS["firm"](tau=0.3)  # keywords, checked by the method's own model
    assert (firm.settings.tau, firm.settings.loss_mode) == (0.3, "pairwise")
    with pytest.raises(ConfigError, match="symmetric"):
        METHODS["firm"](symmetric=True)
