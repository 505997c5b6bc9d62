"""TGI routes: /generate, /generate_stream and the compat `POST /`."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import schemas
from .body import parse
from .contract import FinishReason
from .generation import Generation, Piece, collect_all, in_app
from .jobs import Job, tgi_job
from .push import event_stream
from .state import Router, router_of


# The router's finish reasons in TGI's words.
TGI_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "eos_token", FinishReason.STOP_SEQUENCE: "stop_sequence"}


def tgi_details(gen: Generation, job: Job, streamed: bool) -> dict:
    details = {"finish_reason": TGI_FINISH.get(gen.finish_reason), "generated_tokens": len(gen.tokens),
               "seed": gen.seed if job.sampled else None}
    if streamed:
        details["input_length"] = gen.prompt_tokens
    else:
        details.update(prefill=gen.prefill, tokens=gen.tokens)
        if job.request.top_n_tokens:
            details["top_tokens"] = gen.top_tokens
    return details


async def tgi_generate(request: Request) -> Response:
    body = await parse(request, schemas.GenerateRequest)
    return tgi_answer(router_of(request), body, as_list=False)


def tgi_answer(router: Router, body: schemas.GenerateRequest, as_list: bool) -> Response:
    job = tgi_job(router, body)
    p = body.parameters or schemas.Parameters()
    prefix = body.inputs if p.return_full_text else ""

    async def compute() -> Response:
        # best_of: that many sampled candidates; the answer is the one the model found likeliest.
        jobs = job.copies(p.best_of or 1)
        gens = await collect_all(router, jobs, hold_back=False)
        best = max(range(len(gens)), key=lambda i: gens[i].logprob_sum)
        gen = gens[best]
        out = {"generated_text": prefix + gen.text}
        if p.details:
            out["details"] = tgi_details(gen, jobs[best], streamed=False)
            if len(gens) > 1:
                out["details"]["best_of_sequences"] = [
                    {"generated_text": prefix + g.text, **tgi_details(g, j, streamed=False)}
                    for i, (g, j) in enumerate(zip(gens, jobs)) if i != best]
        return JSONResponse([out] if as_list else out, headers={"x-generated-tokens": str(len(gen.tokens))})

    return in_app(compute)


async def tgi_generate_stream(request: Request) -> Response:
    router = router_of(request)
    body = await parse(request, schemas.GenerateRequest)
    body.stream = True  # best_of and decoder_input_details are checked as for a stream
    return tgi_stream(router, body, tgi_job(router, body))


def tgi_stream(router: Router, body: schemas.GenerateRequest, job: Job) -> Response:
    return event_stream(router, [job], TgiPlan(router, body, job), hold_back=False)


class TgiPlan:
    """A TGI stream (push.StreamPlan): one event per token; the last has the whole text, and the details
    when asked for."""

    done = None

    def __init__(self, router: Router, body: schemas.GenerateRequest, job: Job) -> None:
        self.router, self.job = router, job
        self.params = body.parameters or schemas.Parameters()
        self.prefix = body.inputs if self.params.return_full_text else ""
        self.gens = [Generation(prompt_tokens=len(job.request.input_ids))]
        self.index = 0

    def opening(self) -> list[dict | str]:
        return []

    def piece(self, index: int, piece: Piece) -> list[dict | str]:
        gen = self.gens[0]
        self.index += 1
        token = piece.token or self.router.textgen.token_dict(gen.tokens[-1]["id"] if gen.tokens else 0, 0.0, "")
        event = {"index": self.index, "token": token, "generated_text": None, "details": None}
        if self.job.request.top_n_tokens:
            event["top_tokens"] = piece.top_tokens or []
        if piece.finish_reason:
            event["generated_text"] = self.prefix + gen.text
            if self.params.details:
                event["details"] = tgi_details(gen, self.job, streamed=True)
        return [event]

    def closing(self) -> list[dict | str]:
        return []


async def tgi_compat(request: Request) -> Response:
    """`POST /`: TGI's original route, streaming or not as the body says; non-streamed answers are a list."""
    body = await parse(request, schemas.GenerateRequest)
    router = router_of(request)
    if body.stream:
        return tgi_stream(router, body, tgi_job(router, body))
    return tgi_answer(router, body, as_list=True)
