import io

import pytest
import torch
from transformers import get_scheduler

from sftcore.config import TrainConfig
from sftcore.loop import build_scheduler


def _scheduler(kind: str, total: int, warmup_ratio: float = 0.2):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = TrainConfig(data_path="x", lr_scheduler=kind, warmup_ratio=warmup_ratio)
    return optimizer, build_scheduler(cfg, optimizer, total)


def _rates(optimizer, scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def _through_checkpoint(scheduler) -> dict:
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as sftcore.checkpoint loads it


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_is_transformers_curve(kind):
    optimizer, ours = _scheduler(kind, 10)
    theirs_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" else kind
    theirs = get_scheduler(name, theirs_opt, num_warmup_steps=2, num_training_steps=10)
    assert _rates(optimizer, ours, 11) == pytest.approx(_rates(theirs_opt, theirs, 11))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_a_longer_run_continues_the_decay_from_the_rate_it_reached(kind):
    optimizer, short = _scheduler(kind, 10)
    reached = _rates(optimizer, short, 6)  # 6 steps of a 10-step run, then saved
    saved = _through_checkpoint(short)

    optimizer, longer = _scheduler(kind, 20)  # rerun with --max_steps 20: resumes at step 6
    longer.load_state_dict(saved)
    longer.lr_lambdas[0].continue_to(20, 6)
    rates = _rates(optimizer, longer, 14)
    assert rates[0] == pytest.approx(short.get_last_lr()[0])  # no jump at the resumed step
    assert all(later < earlier for earlier, later in zip(rates, rates[1:], strict=False))
    assert rates[-1] > 0 and longer.get_last_lr()[0] == pytest.approx(0.0)  # reaches 0 at the new end
    assert rates[0] < reached[-1]

    # resumed again inside the longer run (the same --max_steps 20), at step 11: the same continued curve
    optimizer, replay = _scheduler(kind, 20)
    replay.load_state_dict(saved)
    replay.lr_lambdas[0].continue_to(20, 6)
    _rates(optimizer, replay, 5)
    optimizer, again = _scheduler(kind, 20)
    again.load_state_dict(_through_checkpoint(replay))
    again.lr_lambdas[0].continue_to(20, 11)
    assert _rates(optimizer, again, 9) == pytest.approx(rates[5:])


def test_constant_schedule_is_unchanged_by_a_longer_run():
    optimizer, short = _scheduler("constant", 10)
    _rates(optimizer, short, 6)
    optimizer, longer = _scheduler("constant", 20)
    longer.load_state_dict(_through_checkpoint(short))
    longer.lr_lambdas[0].continue_to(20, 6)
    assert _rates(optimizer, longer, 14) == [1.0] * 14
