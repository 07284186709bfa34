"""CRM connectors shipped with nurture; each implements :class:`nurture.crm.Connector`."""
