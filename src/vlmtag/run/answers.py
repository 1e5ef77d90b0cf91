"""What a model's reply comes to: keywords to store, a failure, or a reason to ask once more.

One bad answer at a few percent must not cost an image its run, so an unusable or cut-off
answer is asked again once. A model that never answers whole would double every request:
after REASK_MISSES second answers in a row that were no better, the run stops asking again.
An answer cut off twice keeps what could be read. One the server says it cut off (at max
tokens, or where the context ran out) is not asked again: the same request at temperature
0 is cut off at the same place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmtag.errors import ParseError
from vlmtag.models.parse import parse_answer
from vlmtag.models.published import context_fix
from vlmtag.run.dispatcher import Work
from vlmtag.text import one_line
from vlmtag.types import Reply, Request

REASK_MISSES = 5  # re-asks in a row that did not help: stop asking again in this run
STORE, AGAIN, FAIL = "store", "again", "fail"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # STORE, AGAIN or FAIL
    tags: list[tuple[str, float | None]] = field(default_factory=list)
    description: str | None = None
    stage: str = ""
    reason: str = ""


class Answers:
    """Judges each reply of one run; remembers whether asking again has been paying off."""

    def __init__(self, request: Request):
        self.request = request
        self._misses = 0  # answers asked again in a row that were no better

    def judge(
        self, work: Work, reply: Reply | BaseException, *, context: int | None = None
    ) -> Verdict:
        """What to do with this reply; `context` is the server's tokens per request, if said."""
        if isinstance(reply, BaseException):
            reason = one_line(str(reply)) or type(reply).__name__
            return Verdict(FAIL, stage=getattr(reply, "stage", "infer"), reason=reason)
        request = self.request
        try:
            if reply.tags is not None:  # in-process classifiers answer with tags already
                tags = list(reply.tags)
                description = reply.description if request.description else None
            else:
                answer = parse_answer(
                    reply.text, tag_count=request.tag_count, description=request.description
                )
                tags = [(t, None) for t in answer.tags]
                description = answer.description if request.description else None
        except ParseError as exc:
            if reply.cut_off:
                return Verdict(FAIL, stage="parse", reason=self._cut_off(reply, context))
            if self._again(work, usable=False):
                return Verdict(AGAIN)
            return Verdict(FAIL, stage="parse", reason=one_line(str(exc)))
        except Exception as exc:  # noqa: BLE001 - an answer no reader foresaw fails one image
            return Verdict(FAIL, stage="parse", reason=f"unreadable answer: {one_line(repr(exc))}")
        whole = reply.tags is not None or bool(tags and (description or not request.description))
        if reply.cut_off and tags:
            return Verdict(STORE, tags, description)  # what could be read; again is the same
        if self._again(work, usable=whole):
            return Verdict(AGAIN)
        return Verdict(STORE, tags, description)

    def _cut_off(self, reply: Reply, context: int | None) -> str:
        written = reply.timings.get("eval_count")
        limit = self.request.max_tokens
        if written is not None and written >= limit:
            return (
                f"the answer was cut off at max_tokens ({limit}) before a tag could be read;"
                " ask for fewer tags (--tag-count) or no description (--no-description)"
            )
        size = f" after {written:.0f} tokens" if written is not None else ""
        return f"the answer was cut off{size}, no tag could be read: {context_fix(context)}"

    def _again(self, work: Work, *, usable: bool) -> bool:
        if work.asked:  # this was the second answer: keep the count, never a third
            self._misses = 0 if usable else self._misses + 1
            return False
        if usable or self._misses >= REASK_MISSES:
            return False
        work.asked = True
        return True
