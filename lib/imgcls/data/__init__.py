"""Data: reading images, listing a dataset folder, validation records, decoded-image caches."""
