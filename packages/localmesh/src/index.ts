export * from './mesh';
export * from './nats-server';
export * from './processes';
export * from './sanlock-daemon';
export * from './service-process';
export * from './pki';
