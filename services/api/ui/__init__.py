"""The web console under ``/ui``: server-rendered Jinja2 pages, one CSS and a little JavaScript,
all served from this package (nothing from another host). See docs/console.md."""
