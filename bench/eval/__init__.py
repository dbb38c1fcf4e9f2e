"""`make eval`: a small data-structures-and-algorithms task set, scored per engine through the FastAPI door."""
