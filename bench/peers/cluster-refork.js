// The seed's cluster.js (bench/peers/cluster.js) with the seed article's death handler ("Listen for
// the 'death' event on the cluster, and just fork a new worker if one dies"; 'exit' in Node >= 0.8),
// so that SIGTERM to one worker at a time is a rolling restart. Used by bench/restart-clients.
var cluster = require('cluster'), os = require('os');
if (cluster.isPrimary) {
  var n = +(process.env.WORKERS || os.cpus().length), stopping = false;
  for (var i = 0; i < n; i++) cluster.fork();
  cluster.on('exit', function(worker) { if (!stopping) cluster.fork(); });
  process.on('SIGTERM', function(){
    stopping = true;
    var left = Object.keys(cluster.workers).length;
    if (left === 0) process.exit(0);
    for (var id in cluster.workers) { cluster.workers[id].on('exit', function(){ if (--left === 0) process.exit(0); }); cluster.workers[id].process.kill('SIGTERM'); }
  });
} else {
  require('./app.js');
}
