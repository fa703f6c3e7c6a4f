"""`glmtune webui`: a Gradio chat page over a ChatEngine.

The page keeps the conversation per browser tab and sends all of it (after the optional system prompt)
with every question; the answer streams in. Stop ends the answer in progress through the engine's
cancel event, Clear forgets the conversation. Errors (a conversation longer than the context, a failed
generation) appear as a message in the chat. Gradio is imported only when the page is built, with its
telemetry off; no share link is ever made, so nothing leaves this machine.
"""

import os
import threading
from collections.abc import Callable, Iterator

from glmtune.config import GenerationOptions
from glmtune.data.formats import Message
from glmtune.errors import GlmtuneError
from glmtune.serve.engine import ChatRequest, Failed
from glmtune.serve.gradio_page import serve_page

DEFAULT_LONGEST = 4096  # max-new-tokens slider's end when the model's context length is unknown


class Chat:
    """The page's handlers, apart from Gradio so tests can call them directly. `shown` is the chatbot's
    value (what the page displays, errors included); `conversation` (a list of Message, in a gr.State)
    holds only the turns that were answered: what the model sees next time."""

    def __init__(self, engine, system: str | None = None, repetition_penalty: float = 1.0):
        self.engine, self.system, self.repetition_penalty = engine, system, repetition_penalty
        self.running: dict[str, threading.Event] = {}  # browser session -> cancel of its answer in progress

    def respond(self, text: str, shown: list, conversation: list[Message], max_new_tokens: float,
                temperature: float, top_p: float, session: str = "",
                model: str | None = None) -> Iterator[tuple[str, list, list[Message]]]:
        """Yields (textbox, chatbot, conversation) as the answer grows; `model`: the served adapter that answers
        (None: the first)."""
        text = (text or "").strip()
        if not text:
            yield "", shown, conversation
            return
        asked = [*conversation, Message("user", text)]
        shown = [*shown, {"role": "user", "content": text}]
        yield "", shown, conversation  # the question appears (and the box empties) before the model starts
        messages = ([Message("system", self.system)] if self.system else []) + asked
        generation = GenerationOptions(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                       top_p=float(top_p), repetition_penalty=self.repetition_penalty)
        request = ChatRequest(messages, generation, model=model or None)
        cancel = self.running[session] = threading.Event()
        answer, error = "", None
        try:
            for event in self.engine.stream(request, cancel):
                if isinstance(event, str):
                    answer += event
                    yield "", [*shown, {"role": "assistant", "content": answer}], conversation
                elif isinstance(event, Failed):
                    error = event.message
        except GlmtuneError as e:  # BadRequest (e.g. longer than the context) or Busy: tell the user, keep going
            error = str(e)
        finally:
            if self.running.get(session) is cancel:
                del self.running[session]
        if error:  # the failed question stays on the page but is not sent again
            reply = f"⚠️ Error: {error}"
        elif answer:
            reply, conversation = answer, [*asked, Message("assistant", answer)]
        else:
            reply = "(stopped)" if cancel.is_set() else "(no answer)"
        yield "", [*shown, {"role": "assistant", "content": reply}], conversation

    def stop(self, session: str = "") -> None:
        event = self.running.get(session)
        if event is not None:
            event.set()

    def clear(self, session: str = "") -> tuple[list, list[Message]]:
        self.stop(session)
        return [], []

    def stop_all(self) -> None:
        for event in list(self.running.values()):
            event.set()


def _build(engine, *, title: str, system: str | None, max_new_tokens: int, temperature: float, top_p: float,
           repetition_penalty: float = 1.0):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before the import: no telemetry, no version check
    import gradio as gr

    chat = Chat(engine, system, repetition_penalty)
    longest = getattr(engine, "context_length", None) or DEFAULT_LONGEST
    models = [str(name) for name in getattr(engine, "model_names", [None]) if name is not None]

    # gr.Request (found by its annotation) tells browser tabs apart, so Stop ends only this tab's answer.
    def respond(text, shown, conversation, max_new_tokens, temperature, top_p, model=None,
                request: gr.Request = None):
        steps = chat.respond(text, shown, conversation, max_new_tokens, temperature, top_p, _session(request),
                             model)
        yield next(steps)
        for _, shown, conversation in steps:  # leave the box alone: the next question may be typed meanwhile
            yield gr.skip(), shown, conversation

    def stop(request: gr.Request = None):
        chat.stop(_session(request))

    def clear(request: gr.Request = None):
        return chat.clear(_session(request))

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"### {title}")
        # several adapters over one base: which one answers (the conversation stays when it changes)
        choice = gr.Dropdown(models, value=models[0], label="Model", elem_id="model") if len(models) > 1 else None
        # No "share" button: it posts to Hugging Face Spaces.
        chatbot = gr.Chatbot(label="Chat", height=460, feedback_options=None, buttons=["copy", "copy_all"],
                             elem_id="chat")
        conversation = gr.State([])
        with gr.Row():
            box = gr.Textbox(show_label=False, placeholder="Type a message and press Enter", scale=1,
                             autofocus=True, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=0, min_width=100, elem_id="send")
            stop_button = gr.Button("Stop", scale=0, min_width=100, elem_id="stop")
            clear_button = gr.Button("Clear", scale=0, min_width=100, elem_id="clear")
        with gr.Row():
            tokens = gr.Slider(1, longest, value=min(max_new_tokens, longest), step=1, precision=0,
                               label="Max new tokens")
            temp = gr.Slider(0, 2, value=min(temperature, 2.0), step=0.05, label="Temperature (0 = greedy)")
            nucleus = gr.Slider(0.01, 1, value=min(max(top_p, 0.01), 1.0), step=0.01, label="Top-p")
        # One listener for Enter and Send. "once": a question sent while an answer streams is ignored (it stays
        # in the box), as it would be answered against a stale chat. Progress shows on the chat, not the box.
        inputs = [box, chatbot, conversation, tokens, temp, nucleus] + ([choice] if choice is not None else [])
        answering = gr.on([box.submit, send.click], respond, inputs, [box, chatbot, conversation],
                          trigger_mode="once", show_progress_on=chatbot)
        stop_button.click(stop, None, None, queue=False)
        # cancels= drops the answer's remaining updates, so it cannot refill the emptied chat.
        clear_button.click(clear, None, [chatbot, conversation], queue=False, cancels=[answering])
        chatbot.clear(clear, None, [chatbot, conversation], queue=False, cancels=[answering])  # its trash icon
    return demo, chat


def _session(request) -> str:
    return getattr(request, "session_hash", None) or ""


def build_ui(engine, *, title: str, system: str | None = None, max_new_tokens: int = 512,
             temperature: float = 0.0, top_p: float = 1.0):
    """The chat page as a gr.Blocks (not launched)."""
    return _build(engine, title=title, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p)[0]


def launch(engine, *, host: str, port: int, title: str, system: str | None = None, max_new_tokens: int = 512,
           temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           announce: Callable[[], None] | None = None) -> None:
    """Serves the page until Ctrl-C or SIGTERM, then stops any answer in progress and closes the engine."""
    demo, chat = _build(engine, title=title, system=system, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty)
    try:
        # Gradio's queue hands the engine one answer at a time and shows the others waiting. run_history=False:
        # Gradio would otherwise keep every chat in the browser and offer to upload it.
        serve_page(demo, host=host, port=port, concurrency=1, announce=announce, run_history=False)
    finally:
        chat.stop_all()
        engine.close()
