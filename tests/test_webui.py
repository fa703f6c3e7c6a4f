"""`glmtune webui`: the chat handlers with a fake engine, then the real command in a real (headless) browser."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from glmtune.data.formats import Message
from glmtune.serve.engine import BadRequest, Failed, Finished

QUESTION = "What is the capital of France?"


class FakeEngine:
    """ChatEngine's streaming interface: records requests, answers with fixed pieces."""

    context_length = 2048

    def __init__(self, pieces=("The capital", " is", " Paris."), error=None, wait_for_cancel=False):
        self.pieces, self.error, self.wait_for_cancel = pieces, error, wait_for_cancel
        self.requests, self.closed = [], False

    def stream(self, request, cancel=None):
        self.requests.append(request)
        if isinstance(self.error, Exception):
            raise self.error  # as ChatEngine.stream: raised on the first next()
        yield from self.pieces
        if self.error:
            yield Failed(self.error)
            return
        if self.wait_for_cancel:
            assert cancel is not None and cancel.is_set(), "the test presses Stop before this point"
            yield Finished(5, len(self.pieces), "cancelled")
            return
        yield Finished(5, len(self.pieces), "stop")

    def close(self):
        self.closed = True


def _handlers(engine, **options):
    """The Blocks' event functions by name, plus the chatbot (to round-trip values as the browser does)."""
    import gradio as gr

    from glmtune.serve.webui import build_ui

    demo = build_ui(engine, title="tiny", **{"max_new_tokens": 64, **options})
    assert isinstance(demo, gr.Blocks)
    fns = {f.name: f.fn for f in demo.fns.values() if f.name}
    chatbot = next(b for b in demo.blocks.values() if isinstance(b, gr.Chatbot))
    return fns, chatbot, demo


def _send(fns, chatbot, text, shown, conversation, sliders=(64, 0.0, 1.0), session="tab-1"):
    """Runs one turn to the end; returns every (textbox, chatbot, conversation) it yielded, with the chatbot
    value passed through Gradio's postprocess/preprocess as between server and browser."""
    import gradio as gr

    request = SimpleNamespace(session_hash=session)
    steps = list(fns["respond"](text, shown, conversation, *sliders, request=request))
    assert steps[0][0] == "" and all(box == gr.skip() for box, _, _ in steps[1:]), \
        "the text box is emptied once, then left alone (the next question may be typed while an answer streams)"
    return [(box, chatbot.preprocess(chatbot.postprocess(value)), conv) for box, value, conv in steps]


def _texts(shown):
    """(role, text) of each chatbot message in its preprocessed form (content: a list of parts)."""
    return [(m["role"], "".join(part["text"] for part in m["content"])) for m in shown]


def test_chat_streams_keeps_history_and_clears():
    engine = FakeEngine()
    fns, chatbot, _ = _handlers(engine, system="Be brief.")
    assert {"respond", "stop", "clear"} <= fns.keys()

    steps = _send(fns, chatbot, "  Capital of France?  ", [], [], sliders=(33, 0.7, 0.9))
    assert _texts(steps[0][1]) == [("user", "Capital of France?")]  # the question shows before the answer
    growing = [_texts(s[1])[-1][1] for s in steps[1:-1]]
    assert growing == ["The capital", "The capital is", "The capital is Paris."]
    _, shown, conversation = steps[-1]
    assert _texts(shown) == [("user", "Capital of France?"), ("assistant", "The capital is Paris.")]
    request = engine.requests[0]
    options = request.generation
    assert (options.max_new_tokens, options.temperature, options.top_p) == (33, 0.7, 0.9)
    assert isinstance(options.max_new_tokens, int)
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Capital of France?")]

    # The second turn sends the whole conversation: system, first question, first answer, new question.
    engine.pieces = ("Berlin.",)
    _, shown, conversation = _send(fns, chatbot, "And Germany?", shown, conversation)[-1]
    assert [(m.role, m.content) for m in engine.requests[1].messages] == [
        ("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "The capital is Paris."),
        ("user", "And Germany?")]
    assert len(_texts(shown)) == 4 and _texts(shown)[-1] == ("assistant", "Berlin.")
    assert conversation == [Message("user", "Capital of France?"), Message("assistant", "The capital is Paris."),
                            Message("user", "And Germany?"), Message("assistant", "Berlin.")]

    assert _send(fns, chatbot, "   ", shown, conversation)[-1][2] == conversation  # blank: nothing is asked
    assert len(engine.requests) == 2
    assert fns["clear"](request=SimpleNamespace(session_hash="tab-1")) == ([], [])


@pytest.mark.parametrize("error", [
    BadRequest("the prompt is 3000 tokens, but this model's context is 2048 tokens; shorten the messages"),
    "generation failed: RuntimeError: boom",
])
def test_errors_show_in_the_chat_and_are_not_sent_again(error):
    engine = FakeEngine(pieces=(), error=error)
    fns, chatbot, _ = _handlers(engine)
    _, shown, conversation = _send(fns, chatbot, "Hello", [], [])[-1]
    assert conversation == []  # the failed turn is not part of what the model sees next time
    (_, question), (role, reply) = _texts(shown)
    assert question == "Hello" and role == "assistant"
    assert reply.startswith("⚠️ Error:") and str(error) in reply

    engine.error, engine.pieces = None, ("Hi!",)
    _, shown, conversation = _send(fns, chatbot, "Hello again", shown, conversation)[-1]
    assert [m.content for m in engine.requests[-1].messages] == ["Hello again"]
    assert _texts(shown)[-1] == ("assistant", "Hi!") and len(shown) == 4


def test_stop_cancels_only_this_tabs_answer():
    engine = FakeEngine(pieces=("Once upon",), wait_for_cancel=True)
    fns, chatbot, _ = _handlers(engine)
    turn = fns["respond"]("Tell a story", [], [], 64, 0.0, 1.0, request=SimpleNamespace(session_hash="tab-1"))
    next(turn), next(turn)  # the question, then the first piece
    fns["stop"](request=SimpleNamespace(session_hash="tab-2"))  # another tab's Stop: no effect here
    fns["stop"](request=SimpleNamespace(session_hash="tab-1"))
    *_, (_, shown, conversation) = turn
    assert shown[-1] == {"role": "assistant", "content": "Once upon"}  # the partial answer stays
    assert conversation == [Message("user", "Tell a story"), Message("assistant", "Once upon")]


def test_sliders_follow_the_engine_and_the_options():
    import gradio as gr

    _, _, demo = _handlers(FakeEngine(), max_new_tokens=5000, temperature=3.0, top_p=0.0)
    sliders = [(b.label, b.minimum, b.maximum, b.value) for b in demo.blocks.values() if isinstance(b, gr.Slider)]
    assert sliders == [("Max new tokens", 1, 2048, 2048), ("Temperature (0 = greedy)", 0, 2, 2.0),
                       ("Top-p", 0.01, 1, 0.01)]
    no_context = FakeEngine()
    no_context.context_length = None
    _, _, demo = _handlers(no_context)
    assert next(b for b in demo.blocks.values() if isinstance(b, gr.Slider)).maximum == 4096


# ---------------------------------------------------------------------------------------------------------
# The real command in a real browser


@pytest.fixture
def webui_url(browser_paths, glmtune_running):
    """Starts `glmtune webui` on a free port (after the browser checks, so a skip costs nothing); yields its
    URL; always stops it."""
    with glmtune_running(["webui", "--port", "0", "--max-new-tokens", "24"], r"chat page at (http://\S+)",
                         timeout=120) as ready:
        yield ready.group(1)


def _normalise(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_webui_in_a_real_browser(tmp_path, browser_paths, webui_url):
    from conftest import headless_chrome
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = None
    try:
        # The model's greedy answer, computed here while the page is idle.
        from glmtune.config import GenerationOptions
        from glmtune.inference.generate import Generator
        from glmtune.models.loader import load_model

        expected = Generator(load_model("smollm2-135m")).generate([[Message("user", QUESTION)]],
                                                                  GenerationOptions(max_new_tokens=24))[0]
        assert expected.strip()

        driver = headless_chrome(browser_paths, tmp_path / "profile")
        driver.get(webui_url)
        wait = WebDriverWait(driver, 30, poll_frequency=0.2)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea"))
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)

        seen = []

        def answered(d):
            """The last bot message, once the chat's progress marker (Gradio's status tracker, shown while the
            answer streams) is hidden again and the text stood still for one poll."""
            bots = d.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")
            trackers = d.find_elements(By.CSS_SELECTOR, "#chat [data-testid='status-tracker']")
            done = bots and trackers and all("hide" in t.get_attribute("class").split() for t in trackers)
            seen.append(bots[-1].text if done else None)
            return seen[-1] if len(seen) > 1 and seen[-1] and seen[-1] == seen[-2] else False

        shown = WebDriverWait(driver, 90, poll_frequency=0.3,
                              ignored_exceptions=(StaleElementReferenceException,)).until(answered)
        assert _normalise(shown) == _normalise(expected)
        users = driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid='user']")
        assert [u.text for u in users] == [QUESTION]
        assert box.get_attribute("value") == ""

        screenshot = tmp_path / "webui.png"
        assert driver.save_screenshot(str(screenshot))
        data = screenshot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000

        driver.find_element(By.ID, "clear").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR,
                                                 "#chat [data-testid='bot'], #chat [data-testid='user']"))
    finally:
        if driver is not None:
            driver.quit()
