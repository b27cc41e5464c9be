"""Input data: loaders per source format (`sources`), canonical tables and splits (`tables`), dispatch (`load`)."""
