"""Day-two operations below FUSE: the pieces of `follow`, agent output, `run`'s
rights, finding the mount, and the bookkeeping that logs a refused lookup once."""

from __future__ import annotations

from outheisfs.dentries import Dentries

# -- one refused lookup, one `denied` event --------------------------------------------


def test_a_refusal_of_a_held_name_waits_for_the_fresh_lookup() -> None:
    d = Dentries()
    ev = ("lookup", "not in the view of a")
    assert not d.refused("a", "/x", ev)  # a name the kernel does not hold: logged
    d.shown("/x")
    assert d.refused("a", "/x", ev)  # the revalidation: held back
    assert not d.refused("a", "/x", ev)  # the fresh lookup: logged
    assert d.overdue("a", "/x") is None  # and the held one is gone
    assert not d.refused("a", "/x", ev)  # the kernel no longer holds it


def test_a_held_refusal_without_a_fresh_lookup_is_logged_when_overdue() -> None:
    d = Dentries()
    ev = ("lookup", "not in the view of a")
    d.shown("/x")
    assert d.refused("a", "/x", ev)
    assert d.overdue("a", "/x") is ev
    assert d.overdue("a", "/x") is None
