"""``negprompt serve`` itself: its command line (bad input refused before anything loads, the help, the
address and limits passed to the server) and one real server on ``::1`` with bounded requests and log lines.

What could break: a bad flag that loads the model before it is refused, a port in use found only after
loading, a remote address served without its warning, a malformed request of megabytes copied whole into the
log, an IPv6 address written without brackets. The page's handlers are in test_web.py and
test_web_limits.py; the page itself in a real browser in test_web_browser.py.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import assert_usage_error

from negprompt.interfaces.cli import main
from negprompt.interfaces.web.settings import ServerLimits, is_loopback


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "0"], "port '0': give 1–65535"),
        (["serve", "--port", "70000"], "port '70000': give 1–65535"),
        (["serve", "--port", "http"], "'http' is not an integer"),
        (["serve", "--host", "0.0.0.0"], "add --allow-remote"),
        (["serve", "--host", "192.168.1.5", "--port", "8000"], "can be reached from other machines"),
        (["serve", "--max-steps", "0"], "not a positive integer"),
        (["serve", "--max-negatives", "17"], "--max-negatives must be a whole number in 1–16"),
        (["serve", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_serve_input_is_one_line_before_anything_loads(argv, message):
    """Exit 2, one line naming the problem; neither torch nor gradio imported (nothing was loaded)."""
    program = (
        "import sys\n"
        "from negprompt.interfaces.cli import main\n"
        f"code = main({argv!r})\n"
        "print(code, [m for m in ('torch', 'gradio', 'diffusers') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "2 []", (done.stdout[-500:], done.stderr[-500:])
    err = done.stderr.strip()
    assert err.startswith("negprompt: error: ") and len(err.splitlines()) == 1 and message in err, err


def test_serve_help_is_light_and_lists_every_limit():
    program = (
        "import sys\n"
        "from negprompt.interfaces.cli import main\n"
        "try:\n"
        "    main(['serve', '--help'])\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, [m for m in ('torch', 'gradio', 'numpy') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout[-300:]
    for name, _, default, _ in ServerLimits.described():
        assert f"{ServerLimits.flag(name)} N" in done.stdout and f"(default {default})" in done.stdout


def test_serve_without_the_web_extra_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # importlib finds no gradio, as when it is not installed
    code = main(["serve", "--port", str(free_port())])
    assert_usage_error(code, capsys, "negprompt serve needs the web extra: pip install 'negprompt[web]'")


def test_a_port_in_use_is_refused_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_usage_error(main(["serve", "--port", str(port)]), capsys, f"cannot listen on 127.0.0.1:{port}")


def test_serve_loads_the_model_and_passes_address_and_limits(monkeypatch, capsys):
    """A remote host with --allow-remote serves with a warning; the limits reach the page."""
    from negprompt.interfaces.web import app

    served = {}
    monkeypatch.setattr(app, "serve", lambda session, host, port, limits: served.update(locals()))
    port = free_port()
    argv = ["serve", "--host", "0.0.0.0", "--allow-remote", "--port", str(port), "--max-steps", "30"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "negprompt: warning: serving on 0.0.0.0" in err and "no login" in err
    assert (served["host"], served["port"], served["limits"].steps) == ("0.0.0.0", port, 30)
    assert served["session"].model == "shapes"


@pytest.mark.parametrize(
    "host, local",
    [("127.0.0.1", True), ("localhost", True), ("127.1.2.3", True), ("::1", True), ("0.0.0.0", False), ("::", False)],
)
def test_which_hosts_count_as_this_machine(host, local):
    assert is_loopback(host) is local


# ---------------------------------------------------------------- the server: IPv6, bounded requests and logs


def test_long_log_lines_are_cut():
    """A malformed request of megabytes is logged by Gradio whole: the server's stderr cuts each line."""
    import io

    from negprompt.interfaces.web.app import CutLongLines

    target = io.StringIO()
    stream = CutLongLines(target, limit=10)
    stream.write("short\nReceived inputs: [")
    stream.write("x" * 50_000_000)
    stream.write("]\nnext line\n")
    assert target.getvalue() == "short\nReceived i … [50000009 more characters cut]\nnext line\n"


def test_serve_on_ipv6_and_bounded_requests(tmp_path):
    """``negprompt serve --host ::1`` serves the page (or, without IPv6, says so in one line); a malformed
    request of 5 MB leaves no line over the log's bound; an upload over the bound is refused."""
    from negprompt.interfaces.web.settings import LOG_LINE_CHARS

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        port = None
    if port is None:  # no IPv6 on this machine: one line, exit 2, before the model loads
        done = subprocess.run(
            [sys.executable, "-m", "negprompt", "serve", "--host", "::1"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and done.stderr.startswith("negprompt: error: cannot listen on ::1")
        return
    import httpx

    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "negprompt", "serve", "--host", "::1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            # SIGINT as a terminal gives it: a test run started in the background ignores SIGINT, and the server
            # would inherit that and never stop (as in tests/test_web_browser.py)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    url = f"http://[::1]:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()[-2000:]
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "negprompt serve --host ::1 did not answer within 120 s"
            time.sleep(0.3)
        started = time.monotonic() - deadline + 120
        # Too few inputs for the event: Gradio logs the inputs it received (5 MB) with its traceback.
        malformed = httpx.post(url + "/gradio_api/run/generate", json={"data": ["x" * 5_000_000]}, timeout=60)
        assert malformed.status_code == 500 and "xxx" not in malformed.text, malformed.text[:200]
        upload = httpx.post(url + "/gradio_api/upload", files={"files": ("big.bin", b"\0" * 2_000_000)}, timeout=60)
        assert upload.status_code == 413, upload.text[:200]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    lines = log_path.read_text().splitlines()
    print(f"server answered after {started:.1f} s")
    assert lines[0].startswith(f"negprompt serve: http://[::1]:{port} ")
    assert max(map(len, lines)) <= LOG_LINE_CHARS + 40 and any("more characters cut" in line for line in lines)


@pytest.mark.parametrize(
    "host, written",
    [("::1", "[::1]"), ("[::1]", "[::1]"), ("::", "[::]"), ("127.0.0.1", "127.0.0.1"), ("localhost", "localhost")],
)
def test_an_ipv6_host_is_written_in_brackets_for_gradio_and_urls(host, written):
    from negprompt.interfaces.web.app import url_host

    assert url_host(host) == written
