"""Thin Ray Data shells over the pure modules: callable classes for ``map_batches`` actor pools
(heavy state in ``__init__``, work in ``__call__``) and the distributed filter operations."""
