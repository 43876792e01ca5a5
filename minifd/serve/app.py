"""The HTTP side of `minifd serve`: a Starlette app over one engine and its scheduler.

    HTTP handler (event loop) --submit--> Scheduler (its own thread, owns the device)
                 <--text pieces, end--  (loop.call_soon_threadsafe into the request's queue)

Handlers parse and check requests (minifd.serve.protocol), turn them into token ids and a Sequence,
and submit them; one thread steps the scheduler while it has work, so the running batch grows and
shrinks as requests come and go. A handler waits on its request's asyncio queue and answers with the
whole completion or streams it as server-sent events; a client that goes away cancels its request,
whose slot is free at the next step. Errors a client causes are OpenAI JSON errors and the server
keeps serving.
"""

import asyncio
import contextlib
import queue
import sys
import threading
import time

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from minifd.errors import MinifdError
from minifd.sampling import SamplingParams, draw_seed
from minifd.scheduler import Request, queue_is_full
from minifd.serve.metrics import Metrics
from minifd.serve.protocol import (ProtocolError, Reply, Usage, check_authorization, error_body, invalid, model_list,
                                   parse_chat_request, parse_completion_request, queue_full, response_body,
                                   server_error, stream_end, stream_error, stream_piece, stream_start,
                                   tokens_to_generate)

IDLE_WAIT_SECONDS = 0.05  # how long the scheduler thread sleeps between looks at an empty queue


class Server:
    """One engine served: the scheduler, its thread, the counters. slots: the most requests decoding
    together; max_queue: the most waiting; context: positions per request (prompt and completion)."""

    def __init__(self, engine, served_model, slots=8, max_queue=64, context=None, api_key=None):
        self.engine, self.served_model, self.api_key = engine, served_model, api_key
        self.context = min(context or engine.model.max_seq, engine.model.max_seq)
        self.slots, self.max_queue = slots, max_queue
        self.scheduler = engine.scheduler(slots, self.context)
        self.metrics = Metrics()
        self.started = int(time.time())
        # Handlers never wait for a step: they post to the inbox, which the scheduler's thread empties
        # between steps, and count what they let in under a lock no step holds.
        self._inbox = queue.SimpleQueue()  # ("submit" | "cancel", Request) or ("stop", None)
        self._admitted = 0  # requests submitted and not yet finished
        self._admitted_lock = threading.Lock()
        self._work = threading.Event()
        self._thread = threading.Thread(target=self._run, name="minifd-scheduler", daemon=True)

    # --- the scheduler's thread -----------------------------------------------------------------

    def start(self):
        self._thread.start()

    def stop(self):
        """Cancel what is left and end the thread (after the server has stopped taking requests)."""
        self._post("stop", None)
        self._thread.join()

    def _run(self):
        while True:
            while not self._inbox.empty():
                kind, request = self._inbox.get()
                if kind == "stop":
                    for left in [slot.request for slot in self.scheduler.slots if slot is not None] + list(
                            self.scheduler.waiting):
                        self.scheduler.cancel(left)
                    return
                if kind == "submit":
                    self.scheduler.submit(request)
                elif request.sequence.running:  # "cancel": the client has gone
                    self.metrics.count_cancelled()
                    self.scheduler.cancel(request)
            if self.scheduler.busy:
                before = time.perf_counter()
                try:
                    self.scheduler.step()
                except Exception as error:  # the device failed the step: its requests end with a 500, serving goes on
                    print(f"minifd serve: a step failed ({type(error).__name__}: {error}); its requests end",
                          file=sys.stderr)
                    for left in [slot.request for slot in self.scheduler.slots if slot is not None]:
                        self.scheduler.fail(left, error)
                running = sum(slot is not None for slot in self.scheduler.slots)
                self.metrics.set_scheduler_state(len(self.scheduler.waiting), running,
                                                 running / max(time.perf_counter() - before, 1e-9))
            else:
                self._work.wait(IDLE_WAIT_SECONDS)
                self._work.clear()

    def _post(self, kind, request):
        self._inbox.put((kind, request))
        self._work.set()

    def submit(self, request):
        """Queue a request (its on_finish must call release()); a 429 when max_queue wait already."""
        with self._admitted_lock:
            if queue_is_full(self._admitted, self.slots, self.max_queue):  # the scheduler's own rule
                raise queue_full(self.max_queue)
            self._admitted += 1
        self._post("submit", request)

    def release(self):
        """A submitted request has finished."""
        with self._admitted_lock:
            self._admitted -= 1

    def cancel(self, request):
        """A request whose client has gone: it ends where it stands, before the next step."""
        self._post("cancel", request)

    # --- the app ---------------------------------------------------------------------------------

    def app(self):
        routes = [Route("/health", self.health), Route("/metrics", self.render_metrics),
                  Route("/v1/models", self.models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        return Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.start()
        yield
        self.stop()

    async def health(self, http_request):
        return JSONResponse({"status": "ok"})

    async def render_metrics(self, http_request):
        return PlainTextResponse(self.metrics.render(), media_type=self.metrics.content_type)

    async def models(self, http_request):
        try:
            self._authorize(http_request)
        except ProtocolError as error:
            return self._error("/v1/models", error)
        return JSONResponse(model_list(self.served_model, self.started))

    async def completions(self, http_request):
        return await self._complete(http_request, "/v1/completions", parse_completion_request,
                                    lambda request: self.engine.tokenizer.encode(request.prompt))

    async def chat_completions(self, http_request):
        return await self._complete(http_request, "/v1/chat/completions", parse_chat_request,
                                    lambda request: self.engine.apply_chat_template(request.message_dicts()))

    def _authorize(self, http_request):
        if self.api_key is not None:
            check_authorization(http_request.headers.get("authorization"), self.api_key)

    def _error(self, endpoint, error):
        self.metrics.count_request(endpoint, error.status)
        return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)

    async def _complete(self, http_request, endpoint, parse, prompt_ids_of):
        loop = asyncio.get_running_loop()
        pieces = asyncio.Queue()  # ("text", piece) ..., then ("end", None)
        try:
            self._authorize(http_request)
            request = parse(await http_request.body(), self.served_model)
            try:
                prompt_ids = prompt_ids_of(request)
            except MinifdError as error:  # no chat template, an empty prompt
                raise invalid(str(error)) from None
            if not prompt_ids:
                raise invalid("the prompt is empty", "prompt" if request.kind == "text" else "messages")
            max_new_tokens = tokens_to_generate(request, len(prompt_ids), self.context)
            sequence = self.engine.sequence(prompt_ids, max_new_tokens, stop=request.stop,
                                            on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait,
                                                                                           ("text", piece)))
            params = SamplingParams(request.temperature, request.top_k, request.top_p, request.min_p,
                                    request.repetition_penalty)
            submitted = Request(sequence, params, draw_seed(request.seed),
                                on_finish=lambda _: (self.release(),
                                                     loop.call_soon_threadsafe(pieces.put_nowait, ("end", None))))
            self.submit(submitted)
        except ProtocolError as error:
            return self._error(endpoint, error)
        reply = Reply.for_request(request)
        if request.stream:
            return StreamingResponse(self._events(endpoint, reply, submitted, pieces), media_type="text/event-stream")
        try:
            while (await pieces.get())[0] != "end":
                pass
        finally:
            if sequence.running:  # the client went away while it waited
                self.cancel(submitted)
        if submitted.error is not None:
            return self._error(endpoint, server_error(submitted.error))
        usage = self._usage(submitted)
        self.metrics.count_request(endpoint, 200)
        return JSONResponse(response_body(reply, sequence.text, sequence.finish_reason, usage))

    async def _events(self, endpoint, reply, submitted, pieces):
        ended = False
        try:
            opening = stream_start(reply)
            if opening:
                yield opening
            while True:
                kind, piece = await pieces.get()
                if kind == "end":
                    ended = True
                    if submitted.error is not None:  # the status line went out already: the error is an event
                        error = server_error(submitted.error)
                        self.metrics.count_request(endpoint, error.status)
                        yield stream_error(error)
                        return
                    yield stream_end(reply, submitted.sequence.finish_reason, self._usage(submitted))
                    self.metrics.count_request(endpoint, 200)
                    return
                yield stream_piece(reply, piece)
        finally:
            if not ended:  # the client disconnected mid-stream: its slot is free at the next step
                self.cancel(submitted)

    def _usage(self, submitted):
        sequence = submitted.sequence
        usage = Usage(len(sequence.prompt_ids), len(sequence.token_ids))
        self.metrics.count_usage(usage)
        return usage
