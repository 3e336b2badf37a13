"""flexrank.runtime: run an exported bundle in onnxruntime, switch budgets, measure it.

    from flexrank.runtime import ElasticSession
    session = ElasticSession("dist/", budget=0.8)
    print(session.generate("Hello", max_new_tokens=16).text)
"""

from flexrank.runtime.session import ElasticSession, Generation, peak_rss_bytes

__all__ = ["ElasticSession", "Generation", "peak_rss_bytes"]
