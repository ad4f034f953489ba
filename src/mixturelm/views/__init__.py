"""Routing views: what the routers of a model decided on a text (`mixturelm inspect`, and the views
`mixturelm compare` embeds in its report). `routing` captures the decisions and summarises them,
`html` holds what the pages are drawn with, `command` writes an inspect folder."""
