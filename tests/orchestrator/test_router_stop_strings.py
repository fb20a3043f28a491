"""StopStringMatcher: the router's stop-string handling over arbitrarily split text."""

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.stop_strings import StopStringMatcher


def run_matcher(stops, pieces):
    matcher = StopStringMatcher(stops)
    emitted = []
    for piece in pieces:
        emitted.append(matcher.push(piece))
        if matcher.is_stopped:
            break
    else:
        emitted.append(matcher.flush())
    return "".join(emitted), matcher.is_stopped


def expected(stops, text):
    starts = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(starts)], True) if starts else (text, False)


def test_stop_string_split_across_pieces_is_truncated():
    assert run_matcher(["END"], ["abc E", "N", "Dxyz"]) == ("abc ", True)


def test_partial_match_is_held_then_released():
    matcher = StopStringMatcher(["END"])
    assert matcher.push("abcE") == "abc"
    assert matcher.push("N") == ""
    assert matcher.push("x") == "ENx"
    assert not matcher.is_stopped
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins():
    assert run_matcher(["world", "lo w"], ["hello world"]) == ("hel", True)


def test_no_stops_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == "abc"
    assert matcher.flush() == ""


def test_held_tail_is_flushed_at_end():
    assert run_matcher(["stop"], ["the st"]) == ("the st", False)


def test_push_after_stop_returns_nothing():
    matcher = StopStringMatcher(["x"])
    assert matcher.push("axb") == "a"
    assert matcher.push("more") == ""


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    text=st.text(alphabet="abcd", max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
)
def test_any_split_gives_the_text_before_the_first_stop(stops, text, cuts):
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run_matcher(stops, pieces) == expected(stops, text)
