"""Tests of mom.utils.signals.StopSignals: a signal asks the loop to stop instead of ending the process."""

from __future__ import annotations

import signal

import pytest

from mom.utils.signals import StopSignals


def test_a_signal_is_recorded_and_a_second_ctrl_c_abandons_the_step(capfd: pytest.CaptureFixture) -> None:
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals(announce=True) as stop:
        assert not stop.requested()
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested() and stop.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM (a launcher's) changes nothing
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert "SIGTERM: stopping after this step" in capfd.readouterr().err
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before  # handlers restored
