"""Serving a Gradio page from a glmtune command (webui, studio): the port checked before anything loads, no
share link, no telemetry, no proxy for Gradio's own startup check, and a clean end on Ctrl-C or SIGTERM."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
from collections.abc import Callable

from glmtune.errors import GlmtuneError

log = logging.getLogger(__name__)


def page_port(command: str, host: str, port: int, exposed: str) -> int:
    """The port the page will use (0: a free one), bound and released here so that a taken port fails before
    anything loads; `exposed` says what others could do when `host` is not this machine only."""
    if importlib.util.find_spec("gradio") is None:
        raise GlmtuneError(f"glmtune {command} needs Gradio, which is not installed: pip install 'glmtune[webui]' "
                           "(make setup installs it)")
    from glmtune.serve.network import is_loopback, listen

    if not is_loopback(host):
        log.warning("listening on %s: anyone who can reach this machine can %s", host, exposed)
    sock = listen(host, port)
    chosen = sock.getsockname()[1]
    sock.close()  # Gradio binds the port itself
    return chosen


def serve_page(demo, *, host: str, port: int, concurrency: int, announce: Callable[[], None] | None = None,
               **launch_options) -> None:
    """Serves `demo` until Ctrl-C or SIGTERM, then closes it (the caller cleans up its own state after)."""
    # Gradio checks its own URL over HTTP before serving; a proxy from the environment must not get that.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"),
                                      "localhost,127.0.0.1,::1", host]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy
    done = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set()) if in_main else None
    try:
        demo.queue(default_concurrency_limit=concurrency)
        demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True,
                    prevent_thread_lock=True, enable_monitoring=False, ssr_mode=False, mcp_server=False, pwa=False,
                    **launch_options)
        if announce is not None:
            announce()
        while not done.wait(0.5):  # a timed wait lets Ctrl-C (KeyboardInterrupt) through at once
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        demo.close()
