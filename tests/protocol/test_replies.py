"""The expected-reply queue against a model of PostgreSQL's replies (postgres.c's rules):
random pipelines of frontend messages from the client and the proxy, random outcomes (errors,
describe kinds, suspended portals), random interleavings of sending and receiving. At every
step the queue must name the owner of each reply, count the ReadyForQuery messages owed, and
know when the server is idle; fed only some message types (as the relay feeds it), it must
still count ReadyForQuery exactly."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pgmigrate_proxy.protocol.replies import Expect, Owner, ReplyQueue, UnexpectedReply
from pgmigrate_proxy.protocol.types import BackendType as B
from pgmigrate_proxy.protocol.types import FrontendType as F

C, P = Owner.CLIENT, Owner.PROXY
FRONTEND = [F.PARSE, F.BIND, F.DESCRIBE, F.CLOSE, F.EXECUTE, F.SYNC, F.FLUSH, F.QUERY,
            F.FUNCTION_CALL]  # fmt: skip


@dataclass(frozen=True)
class Request:
    type: int
    owner: Owner
    fails: bool  # the server answers it with an ErrorResponse
    variant: int  # which of its possible replies (describe kind, rows, suspended)


def server_replies(requests: list[Request]) -> list[list[tuple[int, Owner]]]:
    """PostgreSQL's replies to each request, in order: (backend type, owner of the request)."""
    out: list[list[tuple[int, Owner]]] = []
    skipping = False
    for r in requests:
        replies: list[int] = []
        if skipping and r.type != F.SYNC:
            out.append([])  # discarded until Sync
            continue
        if r.type == F.SYNC:
            skipping = False
            replies = [B.READY_FOR_QUERY]
        elif r.type == F.FLUSH:
            replies = []
        elif r.type == F.QUERY:
            body = [B.ROW_DESCRIPTION, B.DATA_ROW, B.COMMAND_COMPLETE] * (r.variant % 3)
            if r.variant % 3 == 0:
                body = [B.EMPTY_QUERY_RESPONSE]
            replies = [*([B.NOTICE_RESPONSE] if r.variant % 2 else []), *body]
            replies = [*replies, B.ERROR_RESPONSE] if r.fails else replies
            replies.append(B.READY_FOR_QUERY)
        elif r.type == F.FUNCTION_CALL:
            first = B.ERROR_RESPONSE if r.fails else B.FUNCTION_CALL_RESPONSE
            replies = [first, B.READY_FOR_QUERY]
        elif r.fails:
            replies = [B.ERROR_RESPONSE]
            skipping = True
        elif r.type == F.PARSE:
            replies = [B.PARSE_COMPLETE]
        elif r.type == F.BIND:
            replies = [B.BIND_COMPLETE]
        elif r.type == F.CLOSE:
            replies = [B.CLOSE_COMPLETE]
        elif r.type == F.DESCRIBE:
            rows = B.ROW_DESCRIPTION if r.variant % 2 else B.NO_DATA
            replies = [B.PARAMETER_DESCRIPTION, rows] if r.variant % 3 == 0 else [rows]
        elif r.type == F.EXECUTE:
            ends = (B.COMMAND_COMPLETE, B.PORTAL_SUSPENDED, B.EMPTY_QUERY_RESPONSE)
            replies = [B.DATA_ROW] * (r.variant % 3) + [ends[r.variant % 3]]
        out.append([(t, r.owner) for t in replies])
    return out


requests = st.lists(
    st.builds(
        Request,
        type=st.sampled_from(FRONTEND),
        owner=st.sampled_from([C, P]),
        fails=st.sampled_from([False, False, False, True]),
        variant=st.integers(0, 5),
    ),
    max_size=40,
).map(lambda rs: [*rs, Request(F.SYNC, C, False, 0)])  # every pipeline ends with a Sync


def run(
    reqs: list[Request], interleave: list[bool], fed: frozenset[int] | None = None
) -> ReplyQueue:
    """Send the requests and receive the model's replies, interleaved: a True in `interleave`
    receives the next reply when one is due. Checks owners (when every type is fed) and the
    ReadyForQuery count at every step."""
    queue = ReplyQueue()
    replies = server_replies(reqs)
    due: list[tuple[int, Owner]] = []
    owed = 0  # ReadyForQuery messages the model will still send
    choices = iter(interleave)
    sent = 0
    while sent < len(reqs) or due:
        receive = due and (sent == len(reqs) or next(choices, True))
        if receive:
            kind, owner = due.pop(0)
            if fed is not None and kind not in fed and not queue.needs_every_reply:
                continue
            got = queue.received(kind)
            if fed is None:
                assert got is owner, (kind, got, owner, queue.pending())
            if kind == B.READY_FOR_QUERY:
                owed -= 1
        else:
            request = reqs[sent]
            queue.sent(request.type, request.owner)
            due.extend(replies[sent])
            owed += sum(1 for t, _ in replies[sent] if t == B.READY_FOR_QUERY)
            sent += 1
        assert queue.proxy_owed == any(o is P for _, o, _ in queue.pending())
        assert queue.empty == (not queue.pending())
        # An error still in flight decides what the server will discard: until it arrives the
        # queue counts what a success would owe (never less).
        if any(kind == B.ERROR_RESPONSE for kind, _ in due):
            assert queue.readies >= owed, queue.pending()
        else:
            assert queue.readies == owed, queue.pending()
    return queue


@settings(max_examples=400, deadline=None)
@given(reqs=requests, interleave=st.lists(st.booleans(), max_size=120))
def test_owners_and_readies_follow_the_server(reqs: list[Request], interleave: list[bool]) -> None:
    queue = run(reqs, interleave)
    assert queue.idle and queue.pending() == []


#: What the relay may feed: ReadyForQuery, ErrorResponse and CopyInResponse always (they
#: change what is owed in ways no later message reveals), completions as it likes.
ALWAYS = frozenset({B.READY_FOR_QUERY, B.ERROR_RESPONSE, B.COPY_IN_RESPONSE})
WATCHED = [
    ALWAYS,
    ALWAYS | {B.COMMAND_COMPLETE},
    ALWAYS | {B.PARSE_COMPLETE, B.BIND_COMPLETE},
    ALWAYS | {B.ROW_DESCRIPTION, B.NO_DATA, B.DATA_ROW},
]


@settings(max_examples=300, deadline=None)
@given(
    reqs=requests,
    interleave=st.lists(st.booleans(), max_size=120),
    fed=st.sampled_from(WATCHED),
)
def test_fed_only_some_types_it_still_counts_readies(
    reqs: list[Request], interleave: list[bool], fed: frozenset[int]
) -> None:
    queue = run(reqs, interleave, fed)
    assert queue.idle


@given(reqs=requests)
def test_idle_only_when_nothing_is_owed(reqs: list[Request]) -> None:
    queue = ReplyQueue()
    for request in reqs[:-1]:
        queue.sent(request.type, request.owner)
        if request.type not in (F.FLUSH,):
            assert not queue.idle


# --- golden sequences --------------------------------------------------------------------


def test_an_injected_query_is_marked_for_the_proxy_between_client_requests() -> None:
    queue = ReplyQueue()
    queue.sent(F.QUERY)  # the client's
    queue.sent(F.PARSE, P)
    queue.sent(F.BIND, P)
    queue.sent(F.EXECUTE, P)
    queue.sent(F.SYNC, P)
    assert queue.received(B.ROW_DESCRIPTION) is C
    assert queue.received(B.COMMAND_COMPLETE) is C
    assert queue.received(B.READY_FOR_QUERY) is C
    for kind in (B.PARSE_COMPLETE, B.BIND_COMPLETE, B.DATA_ROW, B.COMMAND_COMPLETE):
        assert queue.received(kind) is P
    assert queue.received(B.READY_FOR_QUERY) is P
    assert queue.idle


def test_a_pipeline_of_syncs_is_one_entry() -> None:
    queue = ReplyQueue()
    for _ in range(1000):
        for kind in (F.BIND, F.EXECUTE, F.SYNC):
            queue.sent(kind)
    assert queue.readies == 1000
    assert len(queue.pending()) <= 3 * 1000  # run-length: Bind, Execute, Sync alternate
    for _ in range(1000):
        queue.received(B.READY_FOR_QUERY)
    assert queue.idle


def test_an_error_discards_the_batch_up_to_sync_queries_included() -> None:
    queue = ReplyQueue()
    for kind in (F.PARSE, F.BIND, F.EXECUTE, F.QUERY, F.EXECUTE, F.SYNC):
        queue.sent(kind)
    assert queue.readies == 2
    queue.received(B.ERROR_RESPONSE)
    assert queue.pending() == [(Expect.SYNC, C, 1)]
    queue.received(B.READY_FOR_QUERY)
    assert queue.idle


def test_syncs_sent_during_copy_in_expect_nothing() -> None:
    queue = ReplyQueue()
    for kind in (F.PARSE, F.BIND, F.EXECUTE, F.SYNC):
        queue.sent(kind)
    queue.received(B.PARSE_COMPLETE)
    queue.received(B.BIND_COMPLETE)
    queue.received(B.COPY_IN_RESPONSE)
    assert not queue.idle and queue.copy_in
    queue.sent(F.COPY_DATA)
    queue.sent(F.COPY_DONE)  # the Sync sent before was ignored by the server
    queue.sent(F.SYNC)
    assert queue.readies == 1
    queue.received(B.COMMAND_COMPLETE)
    queue.received(B.READY_FOR_QUERY)
    assert queue.idle


def test_an_extended_copy_whose_data_fails_skips_to_the_next_sync() -> None:
    """The Sync sent behind the Execute was ignored during COPY IN; after the error the server
    discards the client's messages up to its next Sync (found by the in-process fuzzer)."""
    queue = ReplyQueue()
    for kind in (F.PARSE, F.BIND, F.EXECUTE, F.SYNC):
        queue.sent(kind)
    queue.received(B.COPY_IN_RESPONSE)
    queue.sent(F.COPY_DATA)
    assert queue.received(B.ERROR_RESPONSE) is C  # bad data: the COPY fails
    assert not queue.idle
    queue.sent(F.COPY_DONE)  # discarded by the server, as everything up to the Sync
    queue.sent(F.SYNC)
    assert queue.readies == 1
    queue.received(B.READY_FOR_QUERY)
    assert queue.idle


def test_copy_done_sent_before_the_copy_in_response_came() -> None:
    """The client ends a COPY FROM STDIN before the server's CopyInResponse reaches the proxy
    (one write: COPY, Sync, CopyDone): the Sync was ignored all the same (socket fuzzer,
    hang-migration-1-89203, hang-migration-1-88803, hang-1-186198)."""
    queue = ReplyQueue()
    for kind in (F.QUERY, F.SYNC, F.COPY_DONE, F.QUERY):
        queue.sent(kind)
    assert queue.readies == 3
    queue.received(B.COPY_IN_RESPONSE)
    assert queue.readies == 2 and not queue.copy_in  # the Sync went; the client ended it
    queue.received(B.COMMAND_COMPLETE)
    queue.received(B.READY_FOR_QUERY)
    queue.received(B.READY_FOR_QUERY)
    assert queue.idle


def test_copy_done_sent_early_after_an_extended_copy() -> None:
    queue = ReplyQueue()
    for kind in (F.SYNC, F.PARSE, F.BIND, F.EXECUTE, F.SYNC, F.COPY_DONE, F.SYNC):
        queue.sent(kind)
    queue.received(B.READY_FOR_QUERY)  # the first Sync's
    queue.received(B.PARSE_COMPLETE)
    queue.received(B.BIND_COMPLETE)
    queue.received(B.COPY_IN_RESPONSE)
    assert queue.readies == 1 and not queue.copy_in
    queue.received(B.COMMAND_COMPLETE)
    queue.received(B.READY_FOR_QUERY)
    assert queue.idle


def test_a_stray_copy_done_changes_nothing() -> None:
    """A CopyDone after a statement that is no COPY (PostgreSQL ignores it): a later COPY's
    Syncs still count."""
    queue = ReplyQueue()
    for kind in (F.QUERY, F.SYNC, F.COPY_DONE):
        queue.sent(kind)
    queue.received(B.COMMAND_COMPLETE)
    queue.received(B.READY_FOR_QUERY)  # the Query ended: no COPY came
    queue.received(B.READY_FOR_QUERY)
    assert queue.idle
    queue.sent(F.QUERY)
    queue.received(B.COPY_IN_RESPONSE)
    assert queue.copy_in and queue.readies == 1


def test_a_simple_query_copy_that_fails() -> None:
    queue = ReplyQueue()
    queue.sent(F.QUERY)
    queue.received(B.COPY_IN_RESPONSE)
    queue.sent(F.COPY_DATA)
    queue.received(B.ERROR_RESPONSE)
    queue.sent(F.COPY_DONE)  # ignored: the COPY is over
    queue.received(B.READY_FOR_QUERY)
    assert queue.idle


def test_a_ready_for_query_with_nothing_owed_is_the_servers_fault() -> None:
    with pytest.raises(UnexpectedReply):
        ReplyQueue().received(B.READY_FOR_QUERY)


def test_flush_ends_nothing_and_leaves_the_batch_open() -> None:
    queue = ReplyQueue()
    queue.sent(F.PARSE)
    queue.sent(F.FLUSH)
    queue.received(B.PARSE_COMPLETE)
    assert not queue.idle and queue.batch_open and queue.readies == 0
    queue.sent(F.SYNC)
    queue.received(B.READY_FOR_QUERY)
    assert queue.idle


_SENT = [F.PARSE, F.BIND, F.DESCRIBE, F.EXECUTE, F.CLOSE, F.SYNC, F.FLUSH, F.QUERY, F.COPY_DONE,
         F.COPY_FAIL]  # fmt: skip
_RECEIVED = [B.READY_FOR_QUERY, B.ERROR_RESPONSE, B.PARSE_COMPLETE, B.COPY_IN_RESPONSE,
             B.COMMAND_COMPLETE]  # fmt: skip


@settings(max_examples=1000)
@given(
    st.lists(st.sampled_from(_SENT), max_size=30),
    st.lists(st.sampled_from(_RECEIVED), max_size=8),
    st.integers(0, 30),
)
def test_sent_all_is_sent_one_by_one(
    types: list[int], replies: list[int], split: int
) -> None:
    """The relay's one call per chunk leaves the queue as a call per message does."""
    one, many = ReplyQueue(), ReplyQueue()
    for queue in (one, many):  # a state with a reply or two already in
        for kind in types[:split]:
            queue.sent(kind)
        for reply in replies:
            with contextlib.suppress(UnexpectedReply):
                queue.received(reply)
    for kind in types[split:]:
        one.sent(kind)
    rest = list(types[split:])
    extended = sum(t in (F.PARSE, F.BIND, F.DESCRIBE, F.CLOSE, F.EXECUTE) for t in rest)
    many.sent_all(rest, extended)
    assert one.pending() == many.pending()
    assert (one.batch_open, one.copy_in) == (many.batch_open, many.copy_in)
    assert one.readies == many.readies
