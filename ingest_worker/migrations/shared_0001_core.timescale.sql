SELECT create_hypertable('fieldline.dead_letters', by_range('time', INTERVAL '7 days'),
                         if_not_exists => TRUE, migrate_data => TRUE);
