"""Engine: the one generation engine behind serving (async, streamed) and the batch job (sync)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import logging
import time
from collections.abc import AsyncIterator, Sequence

from . import loading
from .compile_cache import CompileCacheReport, compile_seconds, device_tag, engine_cache
from .config import BASE_NAME, EngineConfig
from .decoder import SlotDecoder
from .engine_thread import EngineThread
from .errors import EngineError, EngineFailure, InvalidParameter, PromptTooLong, UnknownModel
from .grammar import Grammars
from .request import Completion, Delta, Request, SamplingParams
from .runner import StepRunner
from .stats import difference
from .textstream import TextStream

log = logging.getLogger(__name__)


def eos_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (`generate` stops at the latter)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return {i for i in ids if i is not None}


def decode_attention(cfg: EngineConfig, loaded) -> str:
    """engine.decode_attention with auto resolved: flex where it runs compiled (CUDA with compile; faster for
    the batch job, see BENCHMARKS.md, "Serving and batch answers, fourth run", item 3), sdpa elsewhere
    (uncompiled flex is a slow reference)."""
    if cfg.decode_attention != "auto":
        return cfg.decode_attention
    return "flex" if loaded.device.type == "cuda" and cfg.compile else "sdpa"


class Engine:
    """Loads the base and adapters once, then answers prompts in continuous batches.

    `adapter` arguments take an adapter name, or None / BASE_NAME for the bare base (not
    available once an adapter is merged into it).
    """

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        started = time.perf_counter()
        self._loaded = loading.load(cfg)
        # How start-up went, for the batch job's and the benchmarks' reports: seconds to load the model
        # and to warm up, and what the compile cache did (compile_cache.CompileCacheReport).
        self.startup: dict = {"load_s": time.perf_counter() - started, "warm_up_s": 0.0, **self._loaded.times}
        log.info("engine: model loaded in %.1f s", self.startup["load_s"])
        self.tokenizer = self._loaded.tokenizer
        self.max_context = loading.context_limit(self._loaded.model, cfg.max_context)
        self.base_name = BASE_NAME
        self.adapter_names = list(cfg.adapters)
        self.training_config = self._loaded.training_config
        self.model_config = self._loaded.model_config
        loaded = self._loaded
        adapters = [] if loaded.merged else list(loaded.adapters)  # merged: the weights hold the adapter
        decoder = SlotDecoder(
            loaded.model, adapters, cfg.max_batch_size, self.max_context, decode_attention(cfg, loaded)
        )
        self.max_batch_size = decoder.cache.slots  # engine.max_batch_size, with auto resolved
        if cfg.max_batch_size == "auto":
            log.info("engine: max_batch_size=auto: %d slots of %d tokens", self.max_batch_size, self.max_context)
        eos = eos_ids(loaded.model, self.tokenizer)
        runner = StepRunner(
            decoder, adapters, self.max_batch_size, self.max_context, eos, cfg.compile, cfg.prefill_tokens
        )
        self._runner = runner
        self._thread = EngineThread(runner)
        # The engine thread detokenises while callers tokenise; fast tokenizers are not safe to share
        # across threads ("Already borrowed"), so the engine thread gets its own copy.
        self._detokenizer = copy.deepcopy(self.tokenizer)
        self._grammars = Grammars(self.tokenizer, loaded.model.config.vocab_size)
        self._compile_cache = engine_cache(cfg.compile_cache, loaded.model, self._compiled_shape(decoder))
        try:
            self.warm_up()
        except Exception:
            self.close()
            raise

    def warm_up(self) -> None:
        """Answer one short prompt, so that compiling the decode layer and capturing the first CUDA
        graphs (tens of seconds on a GPU) happen while the engine starts, not in a user's request.

        With engine.compile_cache, the cached compile artifacts are loaded first (compiling then hits
        them) or, when there were none, what the warm-up compiled is saved after it. The constructor
        calls this; a caller that swapped the runner's decode steps may call it again (only while the
        engine answers nothing)."""
        started = time.perf_counter()
        cache = self._compile_cache
        if cache is not None:
            cache.load()  # once: later warm-ups find it done
        answering, compiled, captured = time.perf_counter(), compile_seconds(), self._runner.stats.capture_s
        self.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0.0), adapter=self.model_names[0])
        saving = time.perf_counter()
        # Of the first answer: torch.compile's compiling (Dynamo's tracing always; Inductor's kernels come
        # from a loaded compile cache), and recording the first CUDA graph (that decode layer's compile included).
        self.startup["compile_s"] = compile_seconds() - compiled
        self.startup["graph_capture_s"] = self._runner.stats.capture_s - captured
        if cache is not None:
            cache.save()
        self.startup["warm_up_s"] = time.perf_counter() - started
        # Of warm_up_s: loading the compile cache, the first answer (tracing, compiling, first graphs), saving.
        self.startup["cache_load_s"] = answering - started
        self.startup["first_answer_s"] = saving - answering
        self.startup["cache_save_s"] = time.perf_counter() - saving
        self.startup["compile_cache"] = (cache.report if cache else CompileCacheReport()).as_dict()
        log.info("engine warmed up in %.1f s", self.startup["warm_up_s"])

    def _compiled_shape(self, decoder: SlotDecoder) -> dict:
        """What the compile cache's key holds besides the model: everything that shapes the compiled graphs."""
        cfg = self.cfg
        return {
            "device": device_tag(decoder.device),
            "dtype": str(decoder.dtype),
            "compile": cfg.compile,
            "max_batch_size": self.max_batch_size,
            "max_context": self.max_context,
            "prefill_tokens": cfg.prefill_tokens,
            "decode_attention": decoder.attention,
            "adapters": len(self._loaded.adapters),
            "merged": self._loaded.merged,
        }

    @property
    def device(self):
        """The torch.device the model runs on."""
        return self._loaded.device

    @property
    def model(self):
        """The model as loaded (PEFT-wrapped when adapters are attached unmerged): what the engine's
        decoder runs, for references such as transformers' `generate`. Read-only use."""
        return self._loaded.model

    @property
    def runner(self) -> StepRunner:
        """The step runner the engine thread drives (its decoder, decode steps, scheduler, stats): a
        hook for tests and measurements. Call into it from one thread, only after
        `engine_thread.wait_parked()` and before the next submit; benchmarks/engine_probe.py builds on it."""
        return self._runner

    @property
    def engine_thread(self) -> EngineThread:
        """The thread that runs the step loop (health, step_timeout_s)."""
        return self._thread

    @property
    def model_names(self) -> list[str]:
        """Names a request may ask for: the base (unless an adapter is merged into it) and each adapter."""
        return self.adapter_names if self._loaded.merged else [self.base_name, *self.adapter_names]

    @property
    def pending(self) -> int:
        """Requests submitted and not finished yet (running or waiting)."""
        return self._thread.pending

    def check_health(self) -> None:
        """Raise EngineFailure (saying why) if the engine thread has died, the engine is closed, or a
        step has been running longer than engine_thread.STEP_TIMEOUT_S (stuck); else return. Cheap: for
        serving's periodic health check. (Compiling and first CUDA graphs happen in the constructor.)"""
        self._thread.check_health()

    def stats(self, since: dict[str, float] | None = None) -> dict[str, float]:
        """The step loop's counters (mistral_qa.engine.stats) since the engine started, or since an
        earlier `stats()` snapshot."""
        now = self._runner.stats.snapshot()
        return now if since is None else difference(now, since)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as a prompt (with BOS, as training tokenised prompts)."""
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def adapter_key(self, name: str | None) -> str | None:
        """The adapter to run for a requested model name (None: the base); UnknownModel if not served."""
        if name is None or name == self.base_name:
            if self._loaded.merged:
                raise UnknownModel(self.base_name, self.model_names)
            return None
        if name not in self.adapter_names:
            raise UnknownModel(name, self.model_names)
        return name

    def make_request(
        self, prompt: str, params: SamplingParams, adapter: str | None = None, template_stop: Sequence[str] = ()
    ) -> Request:
        """Check and tokenise one prompt (raises EngineError subclasses); submit it with submit/stream.

        template_stop: the stop strings of the prompt's template (PromptTemplate.stop, e.g. Alpaca's
        "\n###"), which the caller knows and the engine does not; params.stop adds the request's own.
        """
        key = self.adapter_key(adapter)
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:  # e.g. "" with a tokenizer that adds no BOS: there is no token to continue from
            raise InvalidParameter("prompt", "the prompt is empty: it has 0 tokens; give at least one")
        if len(ids) >= self.max_context:
            raise PromptTooLong(len(ids), self.max_context)
        grammar = self._grammars.compile(params.structured) if params.structured else None
        text = TextStream(self._detokenizer, [*template_stop, *params.stop])
        return Request(ids, params, key, text, self._loaded.device, grammar)

    def submit(self, request: Request) -> None:
        """Queue a request; request.on_delta is called from the engine thread for every new piece."""
        self._thread.submit(request)

    def generate(
        self, prompts: list[str], params: SamplingParams, adapter: str | None = None, template_stop: Sequence[str] = ()
    ) -> list[Completion]:
        """Answer every prompt (any number); results in the order of `prompts`.

        Prompts are queued shortest first so that batches hold prompts of similar length; the
        engine decodes up to max_batch_size of them together and refills slots as answers end.
        """
        requests = [self.make_request(p, params, adapter, template_stop) for p in prompts]
        futures = [concurrent.futures.Future() for _ in requests]
        for request, future in zip(requests, futures, strict=True):
            request.on_delta = _resolve_on_finish(future)
        for i in sorted(range(len(requests)), key=lambda i: requests[i].prompt_tokens):
            self.submit(requests[i])
        return [f.result() for f in futures]

    async def stream(self, request: Request, min_interval: float = 0.0) -> AsyncIterator[Delta]:
        """Submit `request` and yield its pieces as they come; the last carries the Completion.

        Pieces that arrive while the caller is busy come out merged into one, and after a piece the
        next waits until min_interval seconds have passed (the first and the last never wait): one
        HTTP message per few tokens instead of one per token keeps a loaded server's proxy from
        falling behind. Leaving the loop early (client gone) cancels the request inside the engine.
        """
        loop = asyncio.get_running_loop()
        ready: collections.deque[Delta] = collections.deque()
        wake = asyncio.Event()
        scheduled = False  # a wake-up is on its way: later pieces need not send another

        def on_delta(delta: Delta) -> None:  # the engine thread
            nonlocal scheduled
            ready.append(delta)
            if not scheduled:
                scheduled = True
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:  # the caller's event loop has closed: nobody is listening
                    request.cancel()

        request.on_delta = on_delta
        self.submit(request)
        last_piece = None
        try:
            while True:
                await wake.wait()
                if min_interval and last_piece is not None and not (ready and ready[-1].finished):
                    delay = last_piece + min_interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                wake.clear()
                scheduled = False  # before draining: a piece appended from now on sends a new wake-up
                pieces = [ready.popleft() for _ in range(len(ready))]
                if not pieces:
                    continue
                failed = next((p.error for p in pieces if p.error is not None), None)
                if failed is not None:
                    raise failed if isinstance(failed, EngineError) else EngineFailure(failed)
                logprobs = None if pieces[-1].logprobs is None else [lp for p in pieces for lp in p.logprobs]
                yield Delta("".join(p.text for p in pieces), completion=pieces[-1].completion, logprobs=logprobs)
                if pieces[-1].completion is not None:
                    return
                last_piece = loop.time()
        finally:
            request.cancel()  # no-op once finished

    async def complete(self, request: Request) -> Completion:
        async for delta in self.stream(request):
            if delta.completion is not None:
                return delta.completion
        raise EngineFailure(RuntimeError("the engine ended a request without a result"))

    def close(self) -> None:
        self._thread.close()


def _resolve_on_finish(future: concurrent.futures.Future):
    def on_delta(delta: Delta) -> None:
        if delta.error is not None:
            future.set_exception(delta.error)
        elif delta.completion is not None:
            future.set_result(delta.completion)

    return on_delta
