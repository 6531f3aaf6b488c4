"""Model tables, layers, heads and the assembled YOLO network."""
