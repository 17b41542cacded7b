export * from './config';
export * from './errors';
export * from './grpc';
export * from './logger';
export * from './metrics';
export * from './nats';
export * from './service';
export * as pb from './proto';
