"""Who is in which campaign, which step is due, and which lifecycle stage a lead is in."""
