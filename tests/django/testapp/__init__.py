"""A small app whose migrations exercise autocommit sessions and RunPython transactions."""
