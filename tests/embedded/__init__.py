"""Tests of teisup.embedded, the embedded TEI backend."""
