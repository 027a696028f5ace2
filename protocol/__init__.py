"""The shared library every role imports. Importing it never imports torch."""
