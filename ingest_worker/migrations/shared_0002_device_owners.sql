-- Device ids are unique across tenants (the MQTT client id is the certificate's CN): the
-- first tenant a device is seen in owns the id, and a message that puts the same id under
-- another tenant is dead-lettered (a misconfigured broker would otherwise mix tenants).
CREATE TABLE IF NOT EXISTS fieldline.device_owners (
    device_id   text PRIMARY KEY CHECK (device_id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    tenant_id   text NOT NULL REFERENCES fieldline.tenants (id) ON DELETE CASCADE,
    first_seen  timestamptz NOT NULL DEFAULT now()
);
