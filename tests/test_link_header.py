"""The Link header of list pages (urls.link_header), by hypothesis: prev and next point at
the neighbour pages and keep every other query parameter as it came."""

from urllib.parse import parse_qsl, urlsplit

from hypothesis import given
from hypothesis import strategies as st

from urls import link_header

# What werkzeug hands the app from a query string: any text but lone surrogates.
query_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)

BASE = "http://store.example/images"


def parse_link_header(value):
    """{rel: (url without query, [(key, value), ...])} from a Link header."""
    links = {}
    for part in value.split(", "):
        target, _, rel = part.partition(">; rel=")
        assert target.startswith("<") and rel in ('"prev"', '"next"')
        url = urlsplit(target[1:])
        links[rel.strip('"')] = (url._replace(query="").geturl(),
                                 parse_qsl(url.query, keep_blank_values=True))
    return links


@given(args=st.lists(st.tuples(st.one_of(st.just("page"), st.just("search"), query_text),
                               query_text), max_size=5),
       page=st.integers(1, 10**30), has_next=st.booleans())
def test_link_header_points_at_the_neighbour_pages_and_keeps_the_other_parameters(
        args, page, has_next):
    value = link_header(BASE, args, page, has_next)
    if page == 1 and not has_next:
        assert value is None
        return
    links = parse_link_header(value)
    assert set(links) == {rel for rel, present in (("prev", page > 1), ("next", has_next))
                          if present}
    kept = [(k, v) for k, v in args if k != "page"]
    for rel, number in (("prev", page - 1), ("next", page + 1)):
        if rel in links:
            url, query = links[rel]
            assert url == BASE
            assert query == [("page", str(number)), *kept]
