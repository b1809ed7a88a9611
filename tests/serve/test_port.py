"""`fourwalls serve` on a port in use: one line and exit code 2, before any model is loaded."""

from __future__ import annotations

import socket

from fourwalls.cli import main
from fourwalls.store import Store


def test_a_port_in_use_is_one_line_and_exit_2_before_the_model_loads(capsys, monkeypatch):
    def load(*_a, **_k):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(Store, "load", load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2
    assert err == f"fourwalls: error: port {port} on 127.0.0.1 is in use (by another server?); choose another " \
                  "with --port\n"


def test_a_port_out_of_range_is_refused(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port is out of range" in capsys.readouterr().err
