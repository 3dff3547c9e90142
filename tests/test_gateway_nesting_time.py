import time
from exchange.protocol import decode_request, ProtocolError, MAX_LINE

def test_unterminated_string_after_huge_number_is_refused_quickly():
    line = b'{"op":"order","id":1,"a":1e400,"b":"' + b'\\"' * 30000   # ~60 KB < MAX_LINE
    assert len(line) <= MAX_LINE
    t = time.perf_counter()
    try:
        decode_request(line)
    except ProtocolError:
        pass
    assert time.perf_counter() - t < 0.5   # takes ~14 s at HEAD (event loop blocked)
