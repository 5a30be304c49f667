"""Built-in stages, one module each; also the plug-in API's worked examples.

Copy any of these to start your own: ``noop`` (the smallest BatchStage),
``synthetic`` (a Source with rate control), ``null_sink`` and ``jsonl_sink``
(BatchSinks).
"""
