"""Shared test settings: small thread counts so concurrent test processes share a 2-core CPU fairly; a
fixture that preempts a real training run at a chosen update."""
import os
import signal

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def signal_after_update(monkeypatch):
    """``arm(n, signum=SIGTERM)``: data2vec 2.0's training sends its own process ``signum`` once, right after
    update ``n`` (a preemption or Ctrl-C at a known point of a real run)."""
    from d2v2.data2vec2 import Data2Vec2

    def arm(n: int, signum: int = signal.SIGTERM) -> None:
        after_step, fired = Data2Vec2.after_step, []

        def interrupt(self, num_updates, fraction):
            after_step(self, num_updates, fraction)
            if num_updates == n and self.training and not fired:
                fired.append(signum)
                os.kill(os.getpid(), signum)

        monkeypatch.setattr(Data2Vec2, "after_step", interrupt)

    return arm
