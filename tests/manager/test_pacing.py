"""`Pacer`: a control loop pauses its debounce after a quick pass, as long as the pass took after a
slow one (the loop's share of the event loop stays about half), and never more than MAX_PAUSE."""

from __future__ import annotations

import time

import pytest

from shoal.manager.pacing import Pacer


def test_pause_follows_the_last_pass() -> None:
    p = Pacer(0.02)
    assert p.pause() == 0.02
    with p.timing():
        pass
    assert p.pause() == 0.02
    with p.timing():
        time.sleep(0.1)
    assert 0.1 <= p.pause() <= Pacer.MAX_PAUSE
    p.last = 30.0  # a pass of half a minute: the pause is capped
    assert p.pause() == Pacer.MAX_PAUSE
    with pytest.raises(RuntimeError), p.timing():  # a failed pass is timed too
        p.last = 0.0
        time.sleep(0.05)
        raise RuntimeError
    assert p.pause() >= 0.05
