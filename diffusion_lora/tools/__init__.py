"""File tools: inspect, convert (and, later, merge, resize, extract, bake) through ``formats/``."""
