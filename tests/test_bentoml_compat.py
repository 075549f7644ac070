"""The two BentoML workarounds (lab/bentoml_compat.py): each test fails when its workaround stops working,
e.g. after a BentoML upgrade, so that someone looks before it breaks silently."""
from __future__ import annotations

import bentoml
import pytest

from lab import bentoml_compat as compat
from lab.paths import models_dir


def test_the_pinned_bentoml_is_a_tested_version():
    assert compat.tested_version(), (f"bentoml {bentoml.__version__} is not in {compat.TESTED}: check both "
                                     f"workarounds below against it, then add it to TESTED")


def test_the_store_is_where_bentoml_keeps_it():
    from bentoml._internal.configuration.containers import BentoMLContainer

    assert models_dir().resolve() == type(models_dir())(BentoMLContainer.model_store_dir.get()).resolve()


def test_learned_batch_wait_is_capped():
    from bentoml._internal.marshal import dispatcher

    stock = dispatcher.Optimizer(max_latency=5.0)
    assert compat.cap_learned_batch_wait(0)
    capped = dispatcher.Optimizer(max_latency=5.0)
    assert type(capped) is not type(stock)
    for opt in (stock, capped):
        for _ in range(20):  # batches that each waited 200 ms in the queue, as after a burst
            opt.log_outbound(n=64, wait=0.2, duration=0.25)
        opt.trigger_refresh()
    assert stock.wait > 0.1  # BentoML's own optimizer would now hold even a lone request back
    assert capped.wait == 0.0
    # the dispatchers BentoML builds for batchable APIs pick the capped optimizer up
    d = dispatcher.CorkDispatcher(max_latency_in_ms=1000, max_batch_size=8, fallback=lambda: None,
                                  get_batch_size=len)
    assert type(d.optimizer) is type(capped)
    compat.cap_learned_batch_wait(0)  # installing twice does not stack subclasses
    assert dispatcher.Optimizer.__mro__[1] is dispatcher._lab_original_optimizer


def test_staged_create_builds_the_model_outside_the_store(tmp_path):
    staging = tmp_path / "staging"
    with compat.create_staged("compat-staged", {}, {"k": 1}, staging) as model:
        (tmp_path / "x").write_text("x")
        with open(model.path_of("file.txt"), "w") as f:
            f.write("hello")
        tag = model.tag
    staged = compat.staged_path(staging, tag)
    assert staged is not None and (staged / "file.txt").read_text() == "hello"
    assert (staged / "model.yaml").exists()
    with pytest.raises(bentoml.exceptions.NotFound):  # nothing visible in the real store yet
        bentoml.models.get(tag)
