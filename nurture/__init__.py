"""nurture: lead-nurturing automation for Prefect.

The core library: domain logic and persistence. It never imports prefect; the flows in
``flows/`` orchestrate it, and the ``nurture`` command runs it directly.
"""

__version__ = "0.1.0"
