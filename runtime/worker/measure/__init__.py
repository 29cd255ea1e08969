"""What the worker measures besides training: memory forensics, kernel profiles, the host probe and
the timeline of a profiled step."""
